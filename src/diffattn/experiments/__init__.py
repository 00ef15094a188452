"""The comparison study (``diffattn compare``) and its report (``diffattn report``)."""

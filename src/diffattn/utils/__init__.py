"""Small shared helpers for reliability: file checksums (:mod:`.integrity`), the run-directory lock
(:mod:`.lock`) and error types that the command line turns into one line and an exit code
(:mod:`.errors`). See docs/reliability.md."""

"""Start-up (issue #18): the command line imports only what the chosen command needs. `diffattn --help` and the
package root import no torch, transformers or matplotlib; a command imports its own module only. Structural
checks (which modules are loaded), not timings: speed is measured, never asserted."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "numpy")


def _loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return set(out)


def test_help_and_package_root_import_no_heavy_library():
    mods = _loaded("import diffattn, diffattn.cli as c\nc.build_parser(None).format_help()\n"
                   "cfg = diffattn.presets.get('tiny', 'diff_v1')")
    assert not [m for m in HEAVY if m in mods], [m for m in HEAVY if m in mods]


def test_a_command_imports_only_its_own_module():
    mods = _loaded("import diffattn.cli as c\nc.build_parser('report')")
    assert "diffattn.experiments.cli" in mods
    for other in ("diffattn.train.cli", "diffattn.eval.cli", "diffattn.dex.cli", "diffattn.bench.cli", "diffattn.hf.cli_export"):
        assert other not in mods, other
    assert "torch" not in mods and "transformers" not in mods


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "diffattn", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("info", "export", "import", "data", "generate", "eval", "train", "bench", "adapt", "compare", "report"):
        assert f"    {name} " in out, name

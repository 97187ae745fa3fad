"""Start-up cost: `import teal` and the CLI's --help load no torch (what keeps `teal --help` fast); --version."""

import subprocess
import sys


def _torch_after(code: str) -> str:
    probe = code + "\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_import_teal_and_help_load_no_torch():
    assert _torch_after("import teal") == "False"
    assert _torch_after("import sys; sys.argv = ['teal', '--help']\nfrom teal.cli import main\n"
                        "try:\n    main()\nexcept SystemExit:\n    pass") == "False"
    # the lazy names still work
    assert _torch_after("import teal; teal.load_model; teal.Thresholds; teal.sparsify_") == "True"


def test_version():
    from typer.testing import CliRunner

    import teal
    from teal.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"teal {teal.__version__}"


def test_every_teal_name_in_the_readme_resolves():
    """Each `teal.NAME` the README's Python examples and prose use is an attribute of the package (lazy names
    included), so a newcomer's first copy-paste does not raise AttributeError."""
    import re
    from pathlib import Path

    import teal

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = set(re.findall(r"\bteal\.([A-Za-z_][A-Za-z0-9_]*)", readme))
    assert {"load_model", "calibrate", "sparsify_", "quantize_weights"} <= names, names
    missing = sorted(n for n in names if not hasattr(teal, n))
    assert not missing, f"README uses teal.{missing} but the package has no such attribute"

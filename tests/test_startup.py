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

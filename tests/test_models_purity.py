"""models/ is pure torch + numpy: no ray, mlflow, yaml, s3fs, cv2 or PIL."""

import ast
import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("ray", "mlflow", "yaml", "s3fs", "cv2", "PIL", "fsspec", "boto3", "albumentations", "pipeline", "jobs")
MODELS = Path(__file__).resolve().parents[1] / "models"


def test_models_sources_import_only_allowed_modules():
    bad = []
    for path in sorted(MODELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert len(list(MODELS.glob("*.py"))) >= 8
    assert not bad, bad


def test_importing_models_loads_no_forbidden_module():
    code = (
        "import sys, json, models, models.losses, models.checkpoint;"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=MODELS.parent)
    loaded = set(json.loads(out.stdout))
    assert "torch" in loaded and "models" in loaded
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))

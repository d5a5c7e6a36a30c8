"""The trainer side and the coordinator import and run without vLLM."""

import subprocess
import sys

CODE = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("vllm is blocked in this test")
sys.meta_path.insert(0, Block())
import weightsync.control, weightsync.dataplane, weightsync.runtime.cli, weightsync.engine
from weightsync.runtime.cli import build_parser
build_parser()
assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
print("ok")
"""


def test_imports_without_vllm():
    """Importing the control plane, data plane, engine package and CLI never imports vLLM."""
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

"""Deploy check: the simulated model exported as ONNX QDQ and run on a real integer runtime (onnxruntime)."""
from .check import check_extra, deploy_check
from .export import ExportInfo, NotDeployable, deploy_problem, export_onnx
from .runtime import INSTALL_HINT, require_runtime

__all__ = ["export_onnx", "deploy_check", "deploy_problem", "check_extra", "require_runtime", "NotDeployable",
           "ExportInfo", "INSTALL_HINT"]

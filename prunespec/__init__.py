"""prunespec: declarative, schema-validated pruning for PyTorch models.

Write a YAML spec, see the plan, apply it with one engine that installs exactly what
``torch.nn.utils.prune`` installs::

    import prunespec
    report = prunespec.apply(model, "prune.yaml")
    print(report)
"""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it

from . import calibration
from .api import apply, finalize, plan
from .calibration import STATISTICS
from .checkpoint import inspect, load, save
from .distributed import Sharding
from .errors import (
    ApplyError,
    CalibrationError,
    CheckpointError,
    PlanError,
    PluginError,
    PrunespecError,
    RankError,
    ShardingError,
    ShrinkError,
    SpecError,
)
from .hookspecs import hookimpl
from .inventory import Inventory, inventory
from .loader import load_spec, loads_spec
from .masks import Blocks, Channels, Entries, Unit
from .methods.base import Capabilities, MaskContext, PruningMethod
from .planner import Plan, Step
from .plugins import MethodRegistry, load_methods
from .record import CalibrationRecord, Fingerprint
from .report import Report, sparsity
from .scheduler import Scheduler
from .shrink import ShrinkReport, shrink
from .spec import Spec

__all__ = [
    "STATISTICS",
    "ApplyError",
    "Blocks",
    "CalibrationError",
    "CalibrationRecord",
    "Capabilities",
    "Channels",
    "CheckpointError",
    "Entries",
    "Fingerprint",
    "Inventory",
    "MaskContext",
    "MethodRegistry",
    "Plan",
    "PlanError",
    "PluginError",
    "PrunespecError",
    "PruningMethod",
    "RankError",
    "Report",
    "Scheduler",
    "Sharding",
    "ShardingError",
    "ShrinkError",
    "ShrinkReport",
    "Spec",
    "SpecError",
    "Step",
    "Unit",
    "__version__",
    "apply",
    "calibration",
    "finalize",
    "hookimpl",
    "inspect",
    "inventory",
    "load",
    "load_methods",
    "load_spec",
    "loads_spec",
    "plan",
    "save",
    "shrink",
    "sparsity",
]

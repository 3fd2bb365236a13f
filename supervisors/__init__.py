"""OTP-style supervision for Pykka actors and OS processes.

Example:
    ```py
    from supervisors import ChildSpec, ProcessChild, Supervisor, get_registry

    root = Supervisor.start(
        "app",
        strategy="one_for_one",
        intensity=5,
        period=30.0,
        children=[
            ChildSpec("cache", CacheActor.start, name="cache"),
            ChildSpec("worker", lambda: ProcessChild.spawn("app.worker:main"), name="worker"),
        ],
    )
    cache = get_registry(root).wait_for("cache", timeout=1.0)  # survives restarts
    root.stop()  # children stop in reverse order
    ```
"""

import logging as _logging

from supervisors._actor import SupervisedActor as SupervisedActor
from supervisors._actor import fatal as fatal
from supervisors._api import count_children as count_children
from supervisors._api import delete_child as delete_child
from supervisors._api import get_registry as get_registry
from supervisors._api import restart_child as restart_child
from supervisors._api import start_child as start_child
from supervisors._api import terminate_child as terminate_child
from supervisors._api import tree as tree
from supervisors._api import which_children as which_children
from supervisors._channel import Channel as Channel
from supervisors._errors import ActorExit as ActorExit
from supervisors._errors import ActorKilledError as ActorKilledError
from supervisors._errors import AlreadyRegisteredError as AlreadyRegisteredError
from supervisors._errors import ChildNotFoundError as ChildNotFoundError
from supervisors._errors import ChildStateError as ChildStateError
from supervisors._errors import NoProcError as NoProcError
from supervisors._errors import SupervisorConfigError as SupervisorConfigError
from supervisors._errors import SupervisorError as SupervisorError
from supervisors._intensity import add_restart as add_restart
from supervisors._kill import kill as kill
from supervisors._process import ProcessChild as ProcessChild
from supervisors._reason import ProcessExit as ProcessExit
from supervisors._reason import is_normal_exit as is_normal_exit
from supervisors._registry import Registry as Registry
from supervisors._snapshot import ChildCounts as ChildCounts
from supervisors._snapshot import ChildInfo as ChildInfo
from supervisors._snapshot import TreeNode as TreeNode
from supervisors._spec import ChildSpec as ChildSpec
from supervisors._spec import SupervisorFlags as SupervisorFlags
from supervisors._spec import check_child_specs as check_child_specs
from supervisors._spec import check_supervisor_flags as check_supervisor_flags
from supervisors._supervisor import Supervisor as Supervisor

__all__ = [
    "ActorExit",
    "ActorKilledError",
    "AlreadyRegisteredError",
    "Channel",
    "ChildCounts",
    "ChildInfo",
    "ChildNotFoundError",
    "ChildSpec",
    "ChildStateError",
    "NoProcError",
    "ProcessChild",
    "ProcessExit",
    "Registry",
    "SupervisedActor",
    "Supervisor",
    "SupervisorConfigError",
    "SupervisorError",
    "SupervisorFlags",
    "TreeNode",
    "add_restart",
    "check_child_specs",
    "check_supervisor_flags",
    "count_children",
    "delete_child",
    "fatal",
    "get_registry",
    "is_normal_exit",
    "kill",
    "restart_child",
    "start_child",
    "terminate_child",
    "tree",
    "which_children",
]

for _name in __all__:
    # Tracebacks and reprs say supervisors.Supervisor, not supervisors._supervisor.Supervisor.
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("supervisors._"):
        _obj.__module__ = __name__
del _name, _obj

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

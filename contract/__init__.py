"""What the consortium and the hospitals must agree on, defined once: the task, the DP mechanism, the wire format.

This package imports only Flower and the standard library, so the ServerApp, the ClientApp, the privacy ledger and
the auditor can all depend on it without pulling in each other (DESIGN.md, "Layout").
"""

from contract.mechanism import Mechanism, MechanismError
from contract.task import TaskError, TaskSpec

__all__ = ["Mechanism", "MechanismError", "TaskError", "TaskSpec"]

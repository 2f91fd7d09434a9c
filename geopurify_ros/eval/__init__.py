"""Evaluation of the semantic map: bag replay (offline and through the node), metrics and reports.

Light on purpose: importing this package must not pull in rclpy or torch.
"""


class EvalError(Exception):
    """A user-facing evaluation failure; the CLI prints it as one line and exits with status 2."""

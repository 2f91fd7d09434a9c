"""Evaluation of the semantic map: bag replay (offline and through the node), metrics and reports.

Light on purpose: importing this package must not pull in rclpy or torch.
"""


from ..data.bag_source import BagError

# A user-facing evaluation failure; the CLI prints it as one line and exits with status 2. It *is* the bag
# reader's error class (data/ must not import eval/), so bag problems raised in data/ surface the same way.
EvalError = BagError

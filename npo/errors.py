"""The error Self-NPO guidance raises instead of silently running plain CFG."""


class SelfNPOError(RuntimeError):
    """Self-NPO cannot guarantee the negative branch uses the negative weights."""

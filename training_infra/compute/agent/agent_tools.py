"""Kept for `training-infra launch`, which checks a run's secrets policy size with the agent's own function."""

from training_infra.compute.agent.ti_agent.secrets import secrets_policy

__all__ = ["secrets_policy"]

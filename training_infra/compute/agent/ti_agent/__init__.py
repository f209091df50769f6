"""The instance agent (docs/agent.md): one Python process, standard library only, run by the user-data bootstrap."""

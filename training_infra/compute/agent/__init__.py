"""What runs on the instance: the agent package `ti_agent`, shipped as a zipapp the user-data bootstrap runs."""

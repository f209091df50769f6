"""What runs on the instance: agent.sh and the Python helpers it calls (shipped as user data)."""

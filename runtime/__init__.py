"""Entry points that join the control plane and the data plane: CLI, trainer push, daemons."""

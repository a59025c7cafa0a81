"""The node agent: registers this machine with the control plane, heartbeats, and starts, watches
and stops FlowServe instance processes on its command.

app.py (HTTP API + lifespan) · supervisor.py (instance processes) · states.py (transition table,
watch decisions) · heartbeat.py (register + heartbeat loop) · control_plane.py (client, reporter)
· launch.py (command lines) · process.py (spawn, signal, reap) · resources.py · settings.py
· errors.py
"""

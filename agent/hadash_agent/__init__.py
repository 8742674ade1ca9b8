"""hadash-agent: a KVM host agent for hadash, driving libvirt (PROTOCOL.md v1.1).

Self-contained on purpose: it runs on hypervisors, so it imports neither Django nor any
module of the hadash server.
"""

__version__ = "1.1.0"
AGENT_NAME = "hadash-agent"

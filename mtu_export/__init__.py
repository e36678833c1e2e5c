"""mtu-export: Multi-Task Upcycling of diffusion UNets and on-device export."""

__version__ = "0.1.0"

"""The scheduler service: frontend, block manager and scheduling policy; CPU only, never imports
torch."""

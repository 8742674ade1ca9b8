"""Notifications (SPEC R20): channels operators configure, and the durable outbox of
deliveries the engine sends to them (docs/notifications.md)."""

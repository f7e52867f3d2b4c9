"""End-to-end test-time training (TTT-E2E)."""

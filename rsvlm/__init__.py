"""rsvlm."""

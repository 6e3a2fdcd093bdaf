"""The dynamics service: frame history per view + action chunk -> imagined future frames."""

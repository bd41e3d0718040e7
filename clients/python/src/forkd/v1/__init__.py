"""Code generated from proto/forkd/v1 by clients/generate. Do not edit."""

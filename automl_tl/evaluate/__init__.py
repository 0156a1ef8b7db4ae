"""Metrics, ensemble selection and the test scoring that turn a finished sweep into results."""

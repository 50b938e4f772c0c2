"""resilient-ambassador: a sidecar that shields apps from flaky external APIs."""

__version__ = "0.1.0"

"""HTTP fake of the Kubernetes API server for tests of the launcher/k8s/ package."""

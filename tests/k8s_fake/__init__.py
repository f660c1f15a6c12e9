"""HTTP fake of the Kubernetes API server for launcher/k8s.py tests."""

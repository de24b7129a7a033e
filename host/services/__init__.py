"""What the host provides behind the guest's WIT imports: the HTTP gateway, storage
namespaces (tenant and account scopes over a backend) and telemetry sinks."""

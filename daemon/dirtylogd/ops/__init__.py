"""Operations: configuration, systemd integration, Prometheus metrics and the demo."""

"""Loopback mocks of the services the product calls: E2B (`e2b`), the Anthropic Messages API
(`llm`), and what both share (`shared`)."""

"""The sandbox provisioner guest: pure logic written against small ports.

The same code runs natively (tests, simulations) and inside the WebAssembly component,
where `provisioner.component` binds the ports to the WIT imports.
"""

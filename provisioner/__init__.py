"""The sandbox provisioner guest: pure logic written against small ports (`ports`)."""

"""Plain nn.Modules, usable without Lightning."""

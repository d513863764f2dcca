# Makes configs/ importable as the package `ptft.configs` (see pyproject.toml), so the YAML
# files ship inside a wheel. Nothing to import here.

"""`flowers export`, `flowers exports list` and `flowers predict`: a run's model in every format.

run        versions: check the request, write every format, verify each, manifest, publish v<N>
worker     one backend's side (loads model.keras, runs it, writes its formats), in its own process
runtimes   every format opened in its own runtime behind one predict(); `flowers predict`, serving
formats/   the format registry: one module per format (file, writers, runtime, opener, tolerance)

Import the submodule you need (`from flowers.export import runtimes`): this package imports nothing.
"""

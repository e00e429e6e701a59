"""The built-in synthetic world (coloured shapes): generate.py writes the whole dataset
(`python -m minivlm.data.shapes`, see its docstring); config, scene, questions (+ reasoning),
writers and stats are its parts, leaves first."""

"""mlx_gemma4.server: an OpenAI-compatible HTTP server (`python -m mlx_gemma4.server --model PATH`).

app.py holds the routes (`create_app`); engine.py the model worker, which mlx_gemma4.api also uses,
so importing this package does not need FastAPI.
"""

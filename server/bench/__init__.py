"""`mistral-small bench` and `mistral-small compare`: a load generator and an answer comparer for any endpoint
that speaks this project's contract — our server, the hosted Workers AI model, or any OpenAI-compatible server.

Flags, metric names and result keys follow vLLM's `bench serve` (performance.md §6), so its users and tools
feel at home. The package is a client: it never imports the engine's model code, only its tokenizer (to plan
prompt lengths when the endpoint has no /tokenize).

datasets.py   the workload: random, sharegpt, prefix_repetition, random-mm, custom (SampleRequest)
tokens.py     counting a prompt's tokens as the endpoint will (its /tokenize, else mistral-common)
endpoint.py   where requests go: URL, route, model, credentials, hosted or not
backends.py   one request on one route (workers, openai-chat, openai): body, stream and answer parsing
runner.py     arrivals (Poisson / gamma), concurrency cap, the hosted rate limit, retries, progress, interrupts
metrics.py    vLLM's metrics from the per-request records
cost.py       the hosted price beside the local GPU cost
plots.py      PNG plots (the `bench` extra: matplotlib)
compare.py    the same requests to two endpoints, answer by answer
report.py     compare's self-contained HTML report
cli.py        the two subcommands
"""

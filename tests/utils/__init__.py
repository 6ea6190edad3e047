"""Helpers the tests share: tiny configs and prompts (`tiny`), the test tokenizer, the decoding comparer, explicit-loop
references, the Markdown block reader of the docs tests, and the two names of the cache across releases (`compat`)."""

"""Model code shipped next to an exported MoE's weights, loaded by transformers with
trust_remote_code=True. It imports only torch and transformers: the user need not install finemoe."""

"""Model shapes the experiments run at (random weights), as ``LlamaConfig`` keyword arguments.

All but llama2-70b are also shapes of the PyTorch peer (``torch_peers_strong.py``).
``llama3-8b`` is Llama 3 8B (GQA, 128k vocabulary, rope theta 500000; the peer keeps
transformers' default theta, which changes no step time).
"""
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                 num_heads=4, num_kv_heads=4, head_dim=16),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      rope_theta=500000.0),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128),
}

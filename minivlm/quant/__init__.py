"""Weight-only quantisation (int8, int4) applied to a built model by swapping its nn.Linears."""

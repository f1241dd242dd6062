"""Compare the final-parameter digests two training runs wrote (--final); exit 1 if they differ."""

import json
import sys

a, b = (json.load(open(p)) for p in sys.argv[1:3])
same = a["params"] == b["params"]
differ = sorted(k for k in a["params"] if a["params"][k] != b["params"].get(k))
print(f"[compare] {len(a['params'])} parameters: " + ("bit-identical" if same else f"DIFFER: {differ[:5]}"))
sys.exit(0 if same else 1)

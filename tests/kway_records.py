"""Small pairwise and ranked records shared by the K-way trainer tests."""

PAIRS = [
    {"prompt": "count the a: ", "chosen": "aaa", "rejected": "b"},
    {"prompt": "hi ", "chosen": "hello there", "rejected": "go"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"prompt": "x", "chosen": "yz", "rejected": "zzzy"},
    {"prompt": "color? ", "chosen": "blue", "rejected": "green!"},
]
LISTS = [
    {"prompt": "q1 ", "completions": ["aa", "b", "ccc"]},
    {"prompt": "q2 ", "completions": ["dd", "e", "ff", "g!"]},
    {"prompt": "q3 ", "completions": ["h", "ii"]},
    {"prompt": "q4 ", "completions": ["jj", "k", "lll", "m"]},
]

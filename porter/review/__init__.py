"""`porter review`: every change a port makes, where and why, in the terminal, as a side-by-side
HTML page, and as JSON or SARIF 2.1.0 for editors and code scanning.

model: the changes and review items placed in the source and the port (spans: how); rules: the
rules a review names and their help; terminal, html, json_report, sarif: the views; command: the
`porter review` command's work.
"""

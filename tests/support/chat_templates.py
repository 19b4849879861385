"""Chat templates with the constructs real checkpoints use, for checking our renderers against
transformers' (the edge's and the core's: the layers render them with code of their own)."""

# Llama 3.1's shape: the system turn dated by `strftime_now`, `-` whitespace control, a `namespace`,
# `tojson` (no HTML escaping, non-ASCII kept) and a `{% generation %}` block around the assistant's text.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set ns = namespace(turns=0) %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '\n\n' + system_message }}"
    "{{- {'tools': [], 'note': '<Zürich & co>'} | tojson }}<|eot_id|>"
    "{%- for message in messages %}{%- set ns.turns = ns.turns + 1 %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim }}{%- endif %}<|eot_id|>"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    "{{- '' if ns.turns else raise_exception('no turns') }}"
)

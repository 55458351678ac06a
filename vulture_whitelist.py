# ruff: noqa: B018  (bare attribute references are how vulture whitelists are written)
"""Names vulture cannot see used (``make lint`` runs ``vulture src vulture_whitelist.py``).

Each entry is used by something vulture does not read: a framework calling a hook, a wire
or settings field read by pydantic or ``dataclasses.asdict``, a ctypes struct field that
llama.cpp reads, or code that Jinja generates. Dead code does not belong here: delete it.
"""

from vulture.whitelist_utils import Whitelist

_ = Whitelist()

# prompt_toolkit calls a History's hooks (cli/lineedit.py)
_.load_history_strings
_.store_string

# pydantic-settings hooks and the Ollama variables pollama accepts and lists in
# ``serve --help`` without acting on them yet (config.py)
_.settings_customise_sources
_.env_settings
_.dotenv_settings
_.file_secret_settings
_.get_field_value
_.gpu_overhead
_.sched_spread
_.llm_library
_.igpu_enable
_.vulkan
_.debug_log_requests
_.max_transfer_streams
_.remotes
_.auth
_.no_cloud
_.experiment

# wire fields: serialized by pydantic, or by dataclasses.asdict for domain records
_.metadata
_.parameter_size
_.quantization_level
_.modified_at
_.projector_info
_.pollama_version
_.shift
_.parallel_tool_calls
_.username
_.total_duration
_.prompt_eval_duration
_.eval_duration
_.load_duration_ns  # RunnerInfo (worker protocol) and Lease (tests time the load with it)
_.num_keep  # SamplingOptions holds every runtime option of the table (options.py)

# httpcore's network backend interface (registry/hosts.py) and asyncio's protocol hooks
# (registry/netstream.py)
_.connect_tcp
_.connect_unix_socket
_.eof_received
_.pause_writing
_.resume_writing

# ctypes structure fields llama.cpp reads (runner/llama.py, runner/quantize.py)
_.load_mode
_.n_gpu_layers
_.split_mode
_.no_perf
_.nthread
_.embd  # llama_batch's embedding rows (runner/llama.py's _EmbeddingBatch)

# the Jinja sandbox's overrides, and what its generated code calls (template/jinja.py,
# template/_jinja_limits.py)
_.code_generator_class
_.intercepted_binops
_.unsafe_undefined
_.call_binop
_.guarded_join
_.tick
_.visit_Concat

# read by tests, which vulture does not scan: the worker's last output lines and the
# Prometheus text without a request
_.output_tail
_.exposition

# ctypes structure fields written for llama.cpp to read (mtmd_context_params)
_.use_gpu
_.print_timings

# gguf.GGUFWriter.write_tensor_data calls it on each tensor the converter streams out
# (convert/writer.py, _Blocks)
_.tofile

# Python calls a module's __getattr__ for a name it lacks (PEP 562): convert/__init__.py's
# lazy names
_.__getattr__

# click calls a completion class's and a parameter type's hooks (cli/completion.py)
_.source_template
_.complete
_.shell_complete

# asyncio's protocol hooks (registry/netstream.py: a BufferedProtocol reads with recv_into)
_.get_buffer
_.buffer_updated

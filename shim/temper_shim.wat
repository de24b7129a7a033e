;; temper_shim.wat: the Temper-ABI shim for `sandbox-provisioner serve`.
;;
;; A core module (not a component) that Temper's WASM engine loads like any integration
;; module. It forwards the invocation context to the provisioner service and hands the
;; service's answer back as its result:
;;
;;   1. read the context with env.host_get_context (growing the buffer when the host says
;;      the context is larger than the buffer offered);
;;   2. find integration_config.provisioner_url and .provisioner_token by a plain scan;
;;   3. POST the context, unchanged, to provisioner_url with
;;      `Authorization: Bearer <provisioner_token>` through env.host_http_call;
;;   4. on a 2xx answer, pass its body verbatim to env.host_set_result (the service answers
;;      in Temper's terminal-result shape); on anything else, set a typed failure
;;      (ADR-0187 `typed_failure`) whose category a spec routes, e.g. transient -> a retry.
;;
;; `run` always returns 0: the result travels through host_set_result, which Temper's
;; engine reads first (crates/temper-wasm/src/engine/mod.rs, `invoke_blocking`).
;; The import list and its sources are in shim/README.md. Built by build.sh with
;; wasmtime-py's wat2wasm.
;;
;; Memory: the data below lives under offset 1024 because Temper writes the context at
;; offset 1024 before calling run (mod.rs, "write_context"), which would overwrite data
;; placed higher; a failure result and its details are built in 4096..65535 once run has
;; started (see $scratch). The context buffer starts at page 1; the header and answer
;; buffers follow it; memory grows as needed.
(module
  (import "env" "host_get_context" (func $host_get_context (param i32 i32) (result i32)))
  (import "env" "host_set_result" (func $host_set_result (param i32 i32)))
  (import "env" "host_http_call"
    (func $host_http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "host_log" (func $host_log (param i32 i32 i32 i32)))

  (memory (export "memory") 2)

  ;; Offsets and lengths of the constants below (offset, length).
  (data (i32.const 16) "\"integration_config\":{")  ;; cfg_key 16 22
  (data (i32.const 38) "\"provisioner_url\":\"")  ;; url_key 38 19
  (data (i32.const 57) "\"provisioner_token\":\"")  ;; tok_key 57 21
  (data (i32.const 78) "POST")  ;; post 78 4
  (data (i32.const 82) "[[\"content-type\",\"application/json\"],[\"authorization\",\"Bearer ")  ;; hdr_head 82 62
  (data (i32.const 144) "\"]]")  ;; hdr_tail 144 3
  (data (i32.const 147) "{\"success\":false,\"typed_failure\":{\"version\":1,\"category\":\"")  ;; f_head 147 58
  (data (i32.const 205) "\",\"code\":\"")  ;; f_code 205 10
  (data (i32.const 215) "\",\"retryability\":\"")  ;; f_retry 215 18
  (data (i32.const 233) "\",\"outcome\":\"")  ;; f_outcome 233 13
  (data (i32.const 262) "transient")  ;; 262 9
  (data (i32.const 271) "authorization")  ;; 271 13
  (data (i32.const 284) "permanent")  ;; 284 9
  (data (i32.const 293) "integrity")  ;; 293 9
  (data (i32.const 302) "reconcile")  ;; 302 9
  (data (i32.const 311) "with_backoff")  ;; 311 12
  (data (i32.const 323) "after_authorization")  ;; 323 19
  (data (i32.const 342) "never")  ;; 342 5
  (data (i32.const 347) "unknown")  ;; 347 7
  (data (i32.const 354) "not_applied")  ;; 354 11
  (data (i32.const 365) "warn")  ;; 365 4
  (data (i32.const 369) "ProvisionerUnreachable")  ;; 369 22
  (data (i32.const 391) "ProvisionerBusy")  ;; 391 15
  (data (i32.const 406) "ProvisionerError")  ;; 406 16
  (data (i32.const 422) "ProvisionerUnauthorized")  ;; 422 23
  (data (i32.const 445) "ProvisionerRejected")  ;; 445 19
  (data (i32.const 464) "ProvisionerAnswerTooLarge")  ;; 464 25
  (data (i32.const 513) "ContextTooLarge")  ;; 513 15
  ;; Typed failure details (ADR-0187 v1: {"name": {"kind", "value"}}).
  (data (i32.const 540) "\":{\"kind\":\"string\",\"value\":\"")  ;; d_str 540 28
  (data (i32.const 568) "\"}")  ;; d_str_end 568 2
  (data (i32.const 570) "\":{\"kind\":\"unsigned\",\"value\":")  ;; d_uint 570 29
  (data (i32.const 599) "}")  ;; d_uint_end 599 1
  (data (i32.const 600) "status")  ;; k_status 600 6
  (data (i32.const 606) "error_code")  ;; k_error_code 606 10
  (data (i32.const 616) "error_message")  ;; k_error_message 616 13
  (data (i32.const 629) "key")  ;; k_key 629 3
  (data (i32.const 632) "reason")  ;; k_reason 632 6
  (data (i32.const 638) "provisioner_url")  ;; v_url 638 15
  (data (i32.const 653) "provisioner_token")  ;; v_token 653 17
  (data (i32.const 670) "absent")  ;; v_absent 670 6
  (data (i32.const 676) "unresolved_secret")  ;; v_unresolved 676 17
  (data (i32.const 693) "\"code\":\"")  ;; p_code 693 8
  (data (i32.const 701) "\"message\":\"")  ;; p_message 701 11
  (data (i32.const 712) "{secret:")  ;; p_secret 712 8
  (data (i32.const 720) "ProvisionerUrlMissing")  ;; c_url_missing 720 21
  (data (i32.const 741) "ProvisionerTokenMissing")  ;; c_token_missing 741 23
  (data (i32.const 764) "\",\"details\":{")  ;; f_details 764 13
  (data (i32.const 777) "}}}")  ;; f_end 777 3

  ;; The answer buffer: Temper's default max_response_bytes (1 MiB) plus the status line.
  (global $answer_capacity i32 (i32.const 1048640))
  ;; A failure result is built at $scratch from the details gathered at [4096, $details_end).
  ;; Both lie in 1024..65535, where Temper wrote the context before calling run; the shim
  ;; reads its own copy at 65536, so that region is free once run has started.
  (global $scratch i32 (i32.const 8192))
  (global $details_start i32 (i32.const 4096))
  (global $details_end (mut i32) (i32.const 4096))

  ;; Make linear memory at least `end` bytes long; 0 when it cannot grow.
  (func $reserve (param $end i32) (result i32)
    (local $pages i32)
    (local.set $pages
      (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (return (i32.const 0))))))
    (i32.const 1))

  (func $align8 (param $p i32) (result i32)
    (i32.and (i32.add (local.get $p) (i32.const 7)) (i32.const -8)))

  ;; Whether the `len` bytes at a and b are equal.
  (func $equal (param $a i32) (param $b i32) (param $len i32) (result i32)
    (local $i i32)
    (block $differ
      (loop $next
        (if (i32.ge_u (local.get $i) (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ
          (i32.ne (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                  (i32.load8_u (i32.add (local.get $b) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; The address just past the LAST occurrence of the pattern in [start, end), or -1.
  ;; Last, because Temper serialises integration_config after trigger_params and
  ;; entity_state (crates/temper-wasm/src/types.rs, field order), whose keys a caller
  ;; controls; only trace and workflow ids (strings) and http_request follow it.
  (func $after_last (param $start i32) (param $end i32) (param $pat i32) (param $len i32)
    (result i32)
    (local $p i32)
    (if (i32.lt_u (i32.sub (local.get $end) (local.get $start)) (local.get $len))
      (then (return (i32.const -1))))
    (local.set $p (i32.sub (local.get $end) (local.get $len)))
    (loop $back
      (if (call $equal (local.get $p) (local.get $pat) (local.get $len))
        (then (return (i32.add (local.get $p) (local.get $len)))))
      (if (i32.gt_u (local.get $p) (local.get $start))
        (then
          (local.set $p (i32.sub (local.get $p) (i32.const 1)))
          (br $back))))
    (i32.const -1))

  ;; The address just past the FIRST occurrence of the pattern in [start, end), or -1.
  ;; Inside a flat object of strings an unescaped `"key":"` can only be a key.
  (func $after_first (param $start i32) (param $end i32) (param $pat i32) (param $len i32)
    (result i32)
    (local $p i32)
    (local.set $p (local.get $start))
    (loop $forward
      (if (i32.gt_u (i32.add (local.get $p) (local.get $len)) (local.get $end))
        (then (return (i32.const -1))))
      (if (call $equal (local.get $p) (local.get $pat) (local.get $len))
        (then (return (i32.add (local.get $p) (local.get $len)))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $forward))
    (i32.const -1))

  ;; The address of the `}` that closes the object whose body starts at p, skipping
  ;; strings (with their escapes); -1 when the object does not end before `end`.
  (func $object_end (param $p i32) (param $end i32) (result i32)
    (local $c i32) (local $in_string i32) (local $escaped i32)
    (loop $scan
      (if (i32.ge_u (local.get $p) (local.get $end)) (then (return (i32.const -1))))
      (local.set $c (i32.load8_u (local.get $p)))
      (if (local.get $in_string)
        (then
          (if (local.get $escaped)
            (then (local.set $escaped (i32.const 0)))
            (else
              (if (i32.eq (local.get $c) (i32.const 92)) ;; backslash
                (then (local.set $escaped (i32.const 1)))
                (else
                  (if (i32.eq (local.get $c) (i32.const 34)) ;; quote
                    (then (local.set $in_string (i32.const 0)))))))))
        (else
          (if (i32.eq (local.get $c) (i32.const 34))
            (then (local.set $in_string (i32.const 1))))
          (if (i32.eq (local.get $c) (i32.const 125)) ;; }
            (then (return (local.get $p))))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $scan))
    (i32.const -1))

  ;; The length of the string value starting at p (up to its closing quote); -1 when it
  ;; holds an escape (the shim copies values verbatim, so it refuses escaped ones) or does
  ;; not close before `end`.
  (func $plain_string_length (param $p i32) (param $end i32) (result i32)
    (local $i i32) (local $c i32)
    (local.set $i (local.get $p))
    (loop $scan
      (if (i32.ge_u (local.get $i) (local.get $end)) (then (return (i32.const -1))))
      (local.set $c (i32.load8_u (local.get $i)))
      (if (i32.eq (local.get $c) (i32.const 34))
        (then (return (i32.sub (local.get $i) (local.get $p)))))
      (if (i32.eq (local.get $c) (i32.const 92)) (then (return (i32.const -1))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan))
    (i32.const -1))

  ;; Copy len bytes from src to dst; return dst + len.
  (func $put (param $dst i32) (param $src i32) (param $len i32) (result i32)
    (memory.copy (local.get $dst) (local.get $src) (local.get $len))
    (i32.add (local.get $dst) (local.get $len)))

  ;; Set a typed failure (crates/temper-failure/src/declaration.rs, wire shape v1) and
  ;; log its code. The outcome follows the retryability, as validate_failure_semantics
  ;; requires (envelope.rs): `reconcile` <=> `unknown`, anything else `not_applied`.
  (func $fail (param $category i32) (param $category_len i32)
              (param $code i32) (param $code_len i32)
              (param $retry i32) (param $retry_len i32) (result i32)
    (local $p i32)
    (local.set $p (call $put (global.get $scratch) (i32.const 147) (i32.const 58)))
    (local.set $p (call $put (local.get $p) (local.get $category) (local.get $category_len)))
    (local.set $p (call $put (local.get $p) (i32.const 205) (i32.const 10)))
    (local.set $p (call $put (local.get $p) (local.get $code) (local.get $code_len)))
    (local.set $p (call $put (local.get $p) (i32.const 215) (i32.const 18)))
    (local.set $p (call $put (local.get $p) (local.get $retry) (local.get $retry_len)))
    (local.set $p (call $put (local.get $p) (i32.const 233) (i32.const 13)))
    (if (i32.eq (local.get $retry) (i32.const 302))
      (then (local.set $p (call $put (local.get $p) (i32.const 347) (i32.const 7))))
      (else (local.set $p (call $put (local.get $p) (i32.const 354) (i32.const 11)))))
    (local.set $p (call $put (local.get $p) (i32.const 764) (i32.const 13)))
    (local.set $p
      (call $put (local.get $p) (global.get $details_start)
                 (i32.sub (global.get $details_end) (global.get $details_start))))
    (local.set $p (call $put (local.get $p) (i32.const 777) (i32.const 3)))
    (call $host_log (i32.const 365) (i32.const 4) (local.get $code) (local.get $code_len))
    (call $host_set_result
      (global.get $scratch) (i32.sub (local.get $p) (global.get $scratch)))
    (i32.const 0))

  ;; Start a detail: a comma unless it is the first, then `"name`.
  (func $detail_name (param $name i32) (param $name_len i32)
    (local $p i32)
    (local.set $p (global.get $details_end))
    (if (i32.gt_u (local.get $p) (global.get $details_start))
      (then
        (i32.store8 (local.get $p) (i32.const 44)) ;; ,
        (local.set $p (i32.add (local.get $p) (i32.const 1)))))
    (i32.store8 (local.get $p) (i32.const 34)) ;; "
    (global.set $details_end
      (call $put (i32.add (local.get $p) (i32.const 1)) (local.get $name) (local.get $name_len))))

  ;; A string detail; the value must need no escaping (see $plain_prefix).
  (func $detail_string (param $name i32) (param $name_len i32) (param $value i32) (param $len i32)
    (local $p i32)
    (call $detail_name (local.get $name) (local.get $name_len))
    (local.set $p (call $put (global.get $details_end) (i32.const 540) (i32.const 28)))
    (local.set $p (call $put (local.get $p) (local.get $value) (local.get $len)))
    (global.set $details_end (call $put (local.get $p) (i32.const 568) (i32.const 2))))

  ;; An unsigned detail below 1000 (an HTTP status).
  (func $detail_unsigned (param $name i32) (param $name_len i32) (param $n i32)
    (local $p i32)
    (call $detail_name (local.get $name) (local.get $name_len))
    (local.set $p (call $put (global.get $details_end) (i32.const 570) (i32.const 29)))
    (if (i32.ge_u (local.get $n) (i32.const 100))
      (then
        (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.div_u (local.get $n) (i32.const 100))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))))
    (if (i32.ge_u (local.get $n) (i32.const 10))
      (then
        (i32.store8 (local.get $p)
          (i32.add (i32.const 48) (i32.rem_u (i32.div_u (local.get $n) (i32.const 10)) (i32.const 10))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))))
    (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
    (global.set $details_end
      (call $put (i32.add (local.get $p) (i32.const 1)) (i32.const 599) (i32.const 1))))

  ;; How many bytes from p, at most `max`, can be copied into a JSON string as they are:
  ;; up to the first quote, backslash, control byte or non-ASCII byte (so a cut never
  ;; splits an escape or a UTF-8 sequence; Temper drops a result that is not UTF-8).
  (func $plain_prefix (param $p i32) (param $end i32) (param $max i32) (result i32)
    (local $i i32) (local $c i32)
    (loop $scan
      (if (i32.ge_u (local.get $i) (local.get $max)) (then (return (local.get $i))))
      (if (i32.ge_u (i32.add (local.get $p) (local.get $i)) (local.get $end))
        (then (return (local.get $i))))
      (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
      (if (i32.or (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
                  (i32.or (i32.lt_u (local.get $c) (i32.const 32)) (i32.ge_u (local.get $c) (i32.const 128))))
        (then (return (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan))
    (local.get $i))

  ;; A string detail copied from the first `"field":"` in [start, end) (serve's error body,
  ;; {"error":{"code":...,"message":...}}), when there is one.
  (func $detail_from_body (param $name i32) (param $name_len i32)
                          (param $start i32) (param $end i32) (param $pat i32) (param $pat_len i32)
    (local $value i32) (local $len i32)
    (local.set $value
      (call $after_first (local.get $start) (local.get $end) (local.get $pat) (local.get $pat_len)))
    (if (i32.eq (local.get $value) (i32.const -1)) (then (return)))
    (local.set $len (call $plain_prefix (local.get $value) (local.get $end) (i32.const 200)))
    (if (i32.gt_u (local.get $len) (i32.const 0))
      (then
        (call $detail_string (local.get $name) (local.get $name_len) (local.get $value) (local.get $len)))))

  ;; A shim key that is absent, empty, escaped, or a {secret:...} template Temper left
  ;; verbatim (the tenant has no such secret): integrity, never retried, naming the key.
  (func $key_missing (param $key i32) (param $key_len i32) (param $code i32) (param $code_len i32)
                     (param $reason i32) (param $reason_len i32) (result i32)
    (call $detail_string (i32.const 629) (i32.const 3) (local.get $key) (local.get $key_len))
    (call $detail_string (i32.const 632) (i32.const 6) (local.get $reason) (local.get $reason_len))
    (call $fail (i32.const 293) (i32.const 9) (local.get $code) (local.get $code_len)
                (i32.const 342) (i32.const 5)))

  ;; The value at p (len bytes, -1 when absent or escaped): 0 when usable, else the
  ;; failure for `key` (code/code_len) already set.
  (func $check_value (param $p i32) (param $len i32) (param $key i32) (param $key_len i32)
                     (param $code i32) (param $code_len i32) (result i32)
    (if (i32.le_s (local.get $len) (i32.const 0))
      (then
        (drop (call $key_missing (local.get $key) (local.get $key_len) (local.get $code)
                                 (local.get $code_len) (i32.const 670) (i32.const 6)))
        (return (i32.const 1))))
    (if (i32.ge_u (local.get $len) (i32.const 8))
      (then
        (if (call $equal (local.get $p) (i32.const 712) (i32.const 8))
          (then
            (drop (call $key_missing (local.get $key) (local.get $key_len) (local.get $code)
                                     (local.get $code_len) (i32.const 676) (i32.const 17)))
            (return (i32.const 1))))))
    (i32.const 0))

  (func $run (export "run") (param $ctx_ptr i32) (param $ctx_len i32) (result i32)
    (local $ctx i32) (local $capacity i32) (local $len i32) (local $ctx_end i32)
    (local $config i32) (local $config_end i32)
    (local $url i32) (local $url_len i32) (local $token i32) (local $token_len i32)
    (local $headers i32) (local $headers_end i32)
    (local $answer i32) (local $written i32) (local $i i32) (local $c i32)
    (local $status i32) (local $body i32)

    ;; 1. The context, through host_get_context: it answers the needed length when the
    ;;    buffer is too small (host_functions.rs), so grow and ask again. run's own
    ;;    arguments are not used: Temper passes ctx_ptr = 0 when the context does not fit
    ;;    the initial memory (mod.rs).
    (local.set $ctx (i32.const 65536))
    (local.set $capacity (i32.sub (i32.shl (memory.size) (i32.const 16)) (local.get $ctx)))
    (local.set $len (call $host_get_context (local.get $ctx) (local.get $capacity)))
    (if (i32.gt_u (local.get $len) (local.get $capacity))
      (then
        (if (i32.eqz (call $reserve (i32.add (local.get $ctx) (local.get $len))))
          (then
            (return (call $fail (i32.const 293) (i32.const 9) (i32.const 513) (i32.const 15)
                                (i32.const 342) (i32.const 5)))))
        (local.set $capacity (local.get $len))
        (local.set $len (call $host_get_context (local.get $ctx) (local.get $capacity)))
        (if (i32.gt_u (local.get $len) (local.get $capacity))
          (then
            (return (call $fail (i32.const 293) (i32.const 9) (i32.const 513) (i32.const 15)
                                (i32.const 342) (i32.const 5)))))))
    (local.set $ctx_end (i32.add (local.get $ctx) (local.get $len)))

    ;; 2. integration_config.provisioner_url and .provisioner_token; each missing one is its
    ;;    own code, with the key and why in the details.
    (local.set $config
      (call $after_last (local.get $ctx) (local.get $ctx_end) (i32.const 16) (i32.const 22)))
    (local.set $config_end (i32.const -1))
    (if (i32.ne (local.get $config) (i32.const -1))
      (then (local.set $config_end (call $object_end (local.get $config) (local.get $ctx_end)))))
    (if (i32.eq (local.get $config_end) (i32.const -1))
      (then
        (return (call $key_missing (i32.const 638) (i32.const 15) (i32.const 720) (i32.const 21)
                                   (i32.const 670) (i32.const 6)))))
    (local.set $url
      (call $after_first (local.get $config) (local.get $config_end) (i32.const 38) (i32.const 19)))
    (local.set $url_len (i32.const -1))
    (if (i32.ne (local.get $url) (i32.const -1))
      (then (local.set $url_len (call $plain_string_length (local.get $url) (local.get $config_end)))))
    (if (call $check_value (local.get $url) (local.get $url_len)
                           (i32.const 638) (i32.const 15) (i32.const 720) (i32.const 21))
      (then (return (i32.const 0))))
    (local.set $token
      (call $after_first (local.get $config) (local.get $config_end) (i32.const 57) (i32.const 21)))
    (local.set $token_len (i32.const -1))
    (if (i32.ne (local.get $token) (i32.const -1))
      (then
        (local.set $token_len (call $plain_string_length (local.get $token) (local.get $config_end)))))
    (if (call $check_value (local.get $token) (local.get $token_len)
                           (i32.const 653) (i32.const 17) (i32.const 741) (i32.const 23))
      (then (return (i32.const 0))))

    ;; 3. Headers (a JSON array of [name, value] pairs, as host_http_call reads them) and
    ;;    the answer buffer, after the context.
    (local.set $headers (call $align8 (local.get $ctx_end)))
    (local.set $answer
      (call $align8 (i32.add (local.get $headers) (i32.add (local.get $token_len) (i32.const 65)))))
    (if (i32.eqz (call $reserve (i32.add (local.get $answer) (global.get $answer_capacity))))
      (then
        (return (call $fail (i32.const 293) (i32.const 9) (i32.const 513) (i32.const 15)
                            (i32.const 342) (i32.const 5)))))
    (local.set $headers_end (call $put (local.get $headers) (i32.const 82) (i32.const 62)))
    (local.set $headers_end
      (call $put (local.get $headers_end) (local.get $token) (local.get $token_len)))
    (local.set $headers_end (call $put (local.get $headers_end) (i32.const 144) (i32.const 3)))

    (local.set $written
      (call $host_http_call
        (i32.const 78) (i32.const 4)
        (local.get $url) (local.get $url_len)
        (local.get $headers) (i32.sub (local.get $headers_end) (local.get $headers))
        (local.get $ctx) (local.get $len)
        (local.get $answer) (global.get $answer_capacity)))

    ;; -2: the answer did not fit; -1 (or any other negative): the call failed (refused,
    ;; reset, timed out): the service may or may not have run the invocation.
    (if (i32.eq (local.get $written) (i32.const -2))
      (then
        (return (call $fail (i32.const 293) (i32.const 9) (i32.const 464) (i32.const 25)
                            (i32.const 302) (i32.const 9)))))
    (if (i32.lt_s (local.get $written) (i32.const 0))
      (then
        (return (call $fail (i32.const 262) (i32.const 9) (i32.const 369) (i32.const 22)
                            (i32.const 302) (i32.const 9)))))

    ;; 4. "{status}\n{body}".
    (local.set $i (local.get $answer))
    (block $parsed
      (loop $digits
        (if (i32.ge_u (local.get $i) (i32.add (local.get $answer) (local.get $written)))
          (then
            (return (call $fail (i32.const 262) (i32.const 9) (i32.const 406) (i32.const 16)
                                (i32.const 302) (i32.const 9)))))
        (local.set $c (i32.load8_u (local.get $i)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $parsed (i32.eq (local.get $c) (i32.const 10)))
        (if (i32.or (i32.lt_u (local.get $c) (i32.const 48)) (i32.gt_u (local.get $c) (i32.const 57)))
          (then
            (return (call $fail (i32.const 262) (i32.const 9) (i32.const 406) (i32.const 16)
                                (i32.const 302) (i32.const 9)))))
        (local.set $status
          (i32.add (i32.mul (local.get $status) (i32.const 10)) (i32.sub (local.get $c) (i32.const 48))))
        (br_if $digits (i32.lt_u (local.get $status) (i32.const 1000)))
        (return (call $fail (i32.const 262) (i32.const 9) (i32.const 406) (i32.const 16)
                            (i32.const 302) (i32.const 9)))))
    (local.set $body (local.get $i))

    (if (i32.and (i32.ge_u (local.get $status) (i32.const 200)) (i32.lt_u (local.get $status) (i32.const 300)))
      (then
        (call $host_set_result
          (local.get $body)
          (i32.sub (i32.add (local.get $answer) (local.get $written)) (local.get $body)))
        (return (i32.const 0))))
    ;; Every refusal carries the status and serve's error code and message.
    (call $detail_unsigned (i32.const 600) (i32.const 6) (local.get $status))
    (call $detail_from_body (i32.const 606) (i32.const 10) (local.get $body)
      (i32.add (local.get $answer) (local.get $written)) (i32.const 693) (i32.const 8))
    (call $detail_from_body (i32.const 616) (i32.const 13) (local.get $body)
      (i32.add (local.get $answer) (local.get $written)) (i32.const 701) (i32.const 11))
    ;; 503 (all workers busy) and 429: nothing ran; retry with backoff.
    (if (i32.or (i32.eq (local.get $status) (i32.const 503)) (i32.eq (local.get $status) (i32.const 429)))
      (then
        (return (call $fail (i32.const 262) (i32.const 9) (i32.const 391) (i32.const 15)
                            (i32.const 311) (i32.const 12)))))
    (if (i32.or (i32.eq (local.get $status) (i32.const 401)) (i32.eq (local.get $status) (i32.const 403)))
      (then
        (return (call $fail (i32.const 271) (i32.const 13) (i32.const 422) (i32.const 23)
                            (i32.const 323) (i32.const 19)))))
    (if (i32.ge_u (local.get $status) (i32.const 500))
      (then
        (return (call $fail (i32.const 262) (i32.const 9) (i32.const 406) (i32.const 16)
                            (i32.const 302) (i32.const 9)))))
    (call $fail (i32.const 284) (i32.const 9) (i32.const 445) (i32.const 19)
                (i32.const 342) (i32.const 5)))
)

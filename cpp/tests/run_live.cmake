# ask_frame against the live server: one streamed answer about a frame, then a request the
# server must reject (max_tokens 0 -> HTTP 400 -> exit status 3).
file(READ ${STATE}/port PORT)
string(STRIP "${PORT}" PORT)
execute_process(COMMAND ${EXE} --port ${PORT} --image ${STATE}/frame.png --prompt "How many shapes are there?"
                        --max-tokens 16 --expect-nonempty
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "ask_frame failed (${rc})")
endif()
if(NOT out MATCHES "finish=(stop|length)")
  message(FATAL_ERROR "no finish reason in the output")
endif()
execute_process(COMMAND ${EXE} --port ${PORT} --prompt "hi" --max-tokens 0
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 3 OR NOT err MATCHES "HTTP 400")
  message(FATAL_ERROR "expected a clean HTTP 400 for max_tokens 0, got ${rc}: ${err}")
endif()

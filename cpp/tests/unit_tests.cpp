// Unit tests of the client's helpers (no server needed).
#include <cassert>
#include <iostream>
#include <string>
#include <vector>

#include "edge_vila/client.hpp"

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::cerr << __FILE__ << ":" << __LINE__ << ": " #cond "\n";    \
      return 1;                                                       \
    }                                                                 \
  } while (0)

int main() {
  using namespace edge_vila;
  auto b = [](const std::string& s) { return std::vector<std::uint8_t>(s.begin(), s.end()); };
  CHECK(base64_encode(b("")) == "");
  CHECK(base64_encode(b("f")) == "Zg==");
  CHECK(base64_encode(b("fo")) == "Zm8=");
  CHECK(base64_encode(b("foo")) == "Zm9v");
  CHECK(base64_encode(b("foobar")) == "Zm9vYmFy");
  CHECK(json_escape("a\"b\\c\nd\x01") == "a\\\"b\\\\c\\nd\\u0001");
  std::string v;
  CHECK(json_string_field(R"({"delta":{"content":"hi \"there\"\n"}})", "content", &v) && v == "hi \"there\"\n");
  CHECK(json_string_field(R"({"content": "caf\u00e9 \ud83d\ude00"})", "content", &v) && v == "caf\xc3\xa9 \xf0\x9f\x98\x80");
  CHECK(!json_string_field(R"({"content":null})", "content", &v));
  CHECK(!json_string_field(R"({"other":"x"})", "content", &v));
  std::cout << "client unit tests passed\n";
  return 0;
}

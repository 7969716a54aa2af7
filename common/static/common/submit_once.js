// One submission per form, for the console's and the support pages' plain forms: a second
// click (or Enter) while the first is on its way is ignored. Both reached the server, and the
// page showed only the second's answer ("Delivery is cancelled; it can no longer be
// cancelled.", "1 of the selected rows is not in this list") after the first had worked, or
// stored a comment twice. Forms a script sends itself (it prevents the default) are left to it.
(function () {
  "use strict";
  var AGAIN_AFTER_MS = 5000;  // a download (an export) leaves the page as it was: usable again after this

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || event.defaultPrevented || (form.getAttribute("method") || "").toLowerCase() !== "post") {
      return;
    }
    if (form.dataset.submitting) {
      event.preventDefault();
      return;
    }
    form.dataset.submitting = "1";
    setTimeout(function () { delete form.dataset.submitting; }, AGAIN_AFTER_MS);
  });

  // Back to a page the browser kept: its forms can be sent again.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) {
      document.querySelectorAll("form[data-submitting]").forEach(function (form) { delete form.dataset.submitting; });
    }
  });
})();
